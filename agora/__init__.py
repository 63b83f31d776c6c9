"""The `agora` command: the root that joins the CLIs of registry, worker and modelcore."""
