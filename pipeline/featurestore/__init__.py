"""The feature store's serving side: the Redis online read (store.py), the event writer through Feast's push path
(events.py), the durable event log (eventlog.py), recovery after a Redis loss (recovery.py), the read benchmark."""
