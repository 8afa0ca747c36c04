"""The recommendation chain, once: fetch the user's context → retrieve (CF, content, history, popularity) → merge →
filter → hydrate → score → order → explain.

Serving runs it per request (`recommend.Chain`, under a deadline with one fallback ladder), training, evaluation and
`recserve replay` run it over many users (`offline.OfflineChain`), through the same stage objects and step
functions. Ray-free and store-free: the feature store and the model stages are ports (`ports.py`), so the chain
runs over Redis or over the bundle's own features, with the models in-process or behind Ray Serve handles.
"""
