"""fedspine: federated fine-tuning of LLMs across heterogeneous, resource-constrained devices."""

__version__ = "0.1.0"
