"""The ``fedattn`` command line: parsers built from what the layers below declare, user input
read, library calls made, results printed and errors mapped to exit codes.

torch's C++ side logs to stderr on its own (a rendezvous store it cannot reach prints a page of
stack frames before the Python error); a command line speaks in its own one-line messages, so
that log is kept to fatal errors unless the user asks for it (``TORCH_CPP_LOG_LEVEL``).
"""

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
