"""The applications on top of the library: the ``trprompt`` command line, the demo, config files."""
