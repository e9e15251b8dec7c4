"""Graph facts shared by every verb: the one cost model (costs.py) and the one dim binder / shape inference (shapes.py)."""
