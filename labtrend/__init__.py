"""LabTrend: laboratory result histories, forecasts and expert review for clinicians."""

__version__ = "0.1.0"
