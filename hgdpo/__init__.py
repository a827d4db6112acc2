"""hgdpo: HG-DPO preference optimization of your own SD1.5-architecture model, on Ray, in MLflow.

The library does nothing on import; the stages are run by the scripts in ``jobs/``.
"""

__version__ = "0.1.0"
