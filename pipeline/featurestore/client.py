"""The Redis client every part of the online store uses, and the errors of a Redis that does not answer.

A module of its own, light on purpose: it imports redis-py and the settings only, not Feast (whose import costs
seconds of CPU), so an operator's command that only reads counts (`recserve rollout status`) starts fast.
pipeline/featurestore/store.py re-exports these names.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from settings import StoreSettings

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def fast_retry() -> Retry:
    # redis-py's default retries back off for about 8 s; a request must fail fast instead.
    return Retry(ExponentialBackoff(cap=0.05, base=0.005), 2)


def redis_client(settings: StoreSettings) -> redis.Redis:
    """A client of the store's Redis with bounded waits and fast retries; it connects on first use."""
    host, port = settings.host_port
    params = dict(p.split("=", 1) for p in settings.redis.split(",")[1:] if "=" in p)
    return redis.Redis(
        host=host,
        port=port,
        db=int(params.get("db", 0)),
        password=params.get("password"),
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        retry=fast_retry(),
    )
