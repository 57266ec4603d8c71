"""The simulated device fleet: devices that speak the ODP protocol to the server."""
