"""What the operator and the agent agree on, in plain data: the agent API's models, the mesh
modes, the agent's settings, the TLS profile and names, logs and versions. No kernel code: the
operator and the CLI import only this of the agent's side (a test checks it)."""
