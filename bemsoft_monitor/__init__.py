"""bemsoft-monitor: delivers outsourced exams from a legacy LIS database to the Bemsoft API."""

__version__ = "1.0.0"
