"""Reach the Dask scheduler of ``convert --scheduler`` before anything is written.

:func:`check_scheduler` opens and closes one connection to the address with Dask's own transport
(tcp://, tls://, ws:// ...) within Dask's connect timeout (``distributed.comm.timeouts.connect``,
30 s by default; ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT`` sets it). ``convert_cohort`` calls it
before it creates WORK or the de-identification key, so a typo in the address or a scheduler that is
down leaves nothing behind and is reported as the network error it is, naming the address.

Example:
    >>> check_scheduler("tcp://10.0.0.5:8786")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio

from lymphatlas_ds.errors import LymphAtlasError


class SchedulerError(LymphAtlasError):
    """The Dask scheduler named by ``--scheduler`` cannot be reached (network error, bad address)."""


def check_scheduler(address: str) -> None:
    """Raise :class:`SchedulerError` unless a connection to the scheduler at ``address`` opens."""
    import dask
    from distributed.comm import connect

    timeout = dask.config.get("distributed.comm.timeouts.connect")

    async def probe() -> None:
        comm = await connect(address, timeout=timeout)
        await comm.close()

    try:
        asyncio.run(probe())
    except ValueError as e:  # the address itself: no port, unknown protocol
        raise SchedulerError(f"--scheduler {address!r} is not a Dask scheduler address ({e}); expected "
                             "tcp://HOST:PORT as `dask scheduler` prints it. Nothing was written") from e
    except OSError as e:  # unknown host, refused, timed out
        raise SchedulerError(f"network error: cannot reach the Dask scheduler at {address} ({e}). Check the address "
                             "and that `dask scheduler` runs there and is reachable from this machine, or run without "
                             "--scheduler (local processes). Nothing was written") from e
