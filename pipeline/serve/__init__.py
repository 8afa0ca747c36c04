"""Where the chain runs: the typed app args and builder named in every serve config (args.py, app.py), thin Ray
Serve deployments (deployments.py), the Api composed without Ray (local.py, also the benchmark's floor), metrics,
replica start-up priority, the request-id middleware and the HAProxy wrapper."""
