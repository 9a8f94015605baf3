"""The demo service: a FastAPI app wired with a coordinator.Coordinator."""
