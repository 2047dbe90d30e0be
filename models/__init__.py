"""The model side: River model factory, learner, registry, drift and retrain."""
