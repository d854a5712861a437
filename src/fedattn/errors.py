"""Errors a user can act on.

Anything raised as ``FedAttnError`` reaches the command line as one line on stderr and exit code 2;
everything else is a bug and keeps its traceback.
"""

EXIT_USAGE = 2  # a FedAttnError: the user's input, environment or configuration
EXIT_PEER_FAILURE = 3  # a networked run: a party died, stalled or sent a bad frame


class FedAttnError(Exception):
    """A problem with the user's input, environment or a peer, explained in one line."""


class ProtocolError(FedAttnError):
    """A frame received from another party failed validation; it names the sender and the block."""
