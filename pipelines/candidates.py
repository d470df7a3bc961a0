"""Candidate applications: one model's deployment on its own, for a rollout beside the stable variant.

A candidate is a Serve application of its own in the same YAML, so adding, changing or removing it never
touches the main application (whose ``args`` or code changing would replace every replica). It has no HTTP
route (``route_prefix: null``): the main application's ingress sends it the share of traffic its rollout
gives it (``pipelines.rollouts``). Its deployment takes the same settings as the stable one: a ``user_config``
with its model, batching and drift, its own replicas and resources::

    - name: vision-candidate
      route_prefix: null
      import_path: pipelines.candidates:vision
      deployments:
        - name: VisionClassifier
          num_replicas: 1
          user_config:
            model: {version: "2"}
"""

from ray.serve import Application

from deployments.vision import VisionClassifier


def vision(args: dict | None = None) -> Application:
    """A candidate image classifier (``rollouts.vision`` in the ingress's ``user_config``)."""
    return VisionClassifier.bind()
