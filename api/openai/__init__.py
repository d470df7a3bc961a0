"""The OpenAI-compatible API: chat completions, completions, embeddings and the model list."""
