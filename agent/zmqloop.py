from dvswitch.bus import *  # noqa: F403 - moved to dvswitch/bus.py; this name stays for old imports
