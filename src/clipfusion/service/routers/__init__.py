"""One router per resource: health, models, inspections, and the operator page."""
