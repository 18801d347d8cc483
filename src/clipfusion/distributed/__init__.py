"""Scale-out on Ray (the ``ray`` extra): ``predict --engine ray`` as a Ray Data pipeline (decoding in
CPU tasks, scoring in an actor pool that loads the model once per actor) and ``evaluate --engine ray``
with each (category, shots, seed) unit as a Ray task.  Outputs equal the local engine's."""
