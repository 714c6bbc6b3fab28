"""Embedded demo parents: small models lmpress builds and trains itself, offline, then caches.

Real users point recipes at real checkpoints; the demo parents exist so that a new machine
with no internet can run every stage end to end in minutes and see numbers move.
"""

from lmpress.demo.spec import DEMO_PARENTS, DemoSpec

__all__ = ["DEMO_PARENTS", "DemoSpec"]
