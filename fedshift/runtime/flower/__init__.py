"""Every Flower detail of fedshift, in one folder: the runtime entry (``runtime.run_many``, the only call of
``flwr.simulation.run_simulation``), the executor that sends packs of clients as Messages (``executor``), the
ClientApp that plays them on a Ray worker (``client_app``), the message format (``transport``), the polling
patches (``patches``) and the ``flwr run`` app (``app``). Nothing here is imported until a Flower run needs it,
so the in-process executor works without flwr and ray installed.
"""
