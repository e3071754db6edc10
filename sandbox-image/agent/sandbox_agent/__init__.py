"""The sandbox agent: the one resident process of the gateway inside each sandbox (README, The agent)."""
