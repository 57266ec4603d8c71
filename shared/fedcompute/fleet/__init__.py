"""The simulated device fleet: devices that speak the ODP protocol to the server.

``from fedcompute.fleet import Fleet, SimulatedDevice, DeviceHttpClient`` (README, "Simulated fleet").
"""
from fedcompute.fleet.device import ArrayApp, PlanCache, SessionOutcome, SimulatedDevice
from fedcompute.fleet.population import make_devices
from fedcompute.fleet.protocol import DeviceHttpClient, Rejected
from fedcompute.fleet.runner import Fleet, FleetStats, TrainingInterval

__all__ = ["ArrayApp", "DeviceHttpClient", "Fleet", "FleetStats", "PlanCache", "Rejected", "SessionOutcome",
           "SimulatedDevice", "TrainingInterval", "make_devices"]
