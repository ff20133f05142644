"""The fedpers client side: ClientApp, DP training, encrypted personal state, on-device commands."""
