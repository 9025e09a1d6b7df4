"""Code shared by the agent, the controller and the lab: one home for each shared rule."""
