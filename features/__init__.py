"""Feature definitions and their two engines: online (Redis) and offline (pandas).

* :mod:`features.base` - :class:`~features.base.FeatureResult`, the
  :class:`~features.base.FeatureEngine` protocol, :func:`~features.base.to_model_input`.
* :mod:`features.online` - :class:`~features.online.RedisFeatureStore`: per-entity windows
  in Redis, a generated Lua script (:mod:`features.lua`) run once per event, one round trip
  per batch.
* :mod:`features.offline` - :func:`~features.offline.compute_offline`: the same features for
  a whole stream in pandas (the parity tests and the benchmarks; retraining fits on the
  training log's served features instead).

The window of an event at ``ts`` for a feature with window ``W`` is every event of its
entity accepted earlier in arrival order (or itself) with a timestamp in ``(ts - W, ts]``;
late and duplicate events are defined in docs/features.md.
"""
