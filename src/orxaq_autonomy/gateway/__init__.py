"""The gateway wing: `mesh-serve`. The ASGI app (app.py), HTTP input to drafts
(intake.py), the writer process that group-commits them (writer.py) and the Prometheus
metrics (metrics.py)."""
