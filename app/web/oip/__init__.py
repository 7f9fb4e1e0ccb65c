"""The Open Inference Protocol v2 (KServe V2 / Triton) on the wire: its JSON schema (``wire``), the
tensor codec with the binary tensor extension (``codec``) and its error bodies (``errors``). The routes are
in ``app.web.routes.v2``.
"""
