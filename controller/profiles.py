"""Port profiles: the VLAN a port in that profile belongs to. A small fixed set, as an
administrator would define on the VSM. A controller concern: the controller hands out the
VLAN with the port (ATTACH/PREPARE carry it), so an agent never needs to know the profiles."""

from __future__ import annotations

DEFAULT_PROFILES: dict[str, int] = {"default": 100, "web": 110, "app": 120, "db": 130}
