"""The top floor: the `headwater` command line, the HTTP gateway, `up` and the demo.

Nothing below imports it."""
