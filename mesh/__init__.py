"""snrmesh: a serverless, end-to-end encrypted mesh built on the CASQUE SNR scheme.

Sub-packages are layered; see ``docs/architecture.md``:

* ``mesh.crypto``   -- every ``cryptography`` import lives here (recipes, Noise, sealing);
* ``mesh.keyset``   -- Communication Keysets, their JWE copies and node bundles;
* ``mesh.token``    -- secure elements (software token today, PC/SC card later);
* ``mesh.protocol`` -- the sans-IO session protocol;
* ``mesh.transport`` / ``mesh.agent`` -- asyncio adapters;
* ``mesh.cli``      -- the ``snrmesh`` command line.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
