"""The `agora` command: the composition root that joins the CLIs of registry, worker and modelcore."""
