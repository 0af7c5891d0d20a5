"""``meshaccel``: is it working? The user's command (also ``kubectl meshaccel``), reading the
cluster through the Kubernetes API with the user's own credentials (docs/operations.md).

It imports no kernel code (never ``meshaccel.agent``): only the operator's pure modules and
``meshaccel.contract`` (a test checks it), so it runs wherever kubectl does.
"""
