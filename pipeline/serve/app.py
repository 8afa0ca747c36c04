"""The one typed app builder named in every serve config: `import_path: pipeline.serve.app:build_app`.

It binds the same stage classes in the topology the config names: `colocated` (the models run inside the
ingress replica) or `distributed` (each model is a deployment of its own, with its own replicas and hardware).
"""

import os

from ray.serve import Application

from models.bundle import verified
from pipeline.serve.args import AppArgs, local_bundle
from pipeline.serve.deployments import Blender, CollaborativeFilter, ContentModel, Ingress
from settings import AuthSettings


def build_app(args: AppArgs) -> Application:
    bundle = args.bundle_ref()
    # Refuse a missing or altered bundle here, with its message, before any replica starts (a URI's bundle is
    # fetched into this node's cache, which its replicas then share).
    verified(local_bundle(bundle))
    AuthSettings().keys()  # and a malformed API key entry (each replica reads the keys again, and keeps them current)
    settings = args.model_copy(update={"bundle": bundle})  # resolved here, so every replica serves the same one
    if args.topology == "colocated":
        return Ingress.options(num_replicas=args.ingress_replicas or os.cpu_count() or 1).bind(settings)
    return Ingress.bind(settings, CollaborativeFilter.bind(bundle), ContentModel.bind(bundle), Blender.bind(bundle))
