"""The Open Inference Protocol (KServe v2, Triton's HTTP API): ``/v2``, JSON and binary tensors."""
