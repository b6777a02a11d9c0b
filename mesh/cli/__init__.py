"""The ``snrmesh`` command line (entry point: :func:`mesh.cli.main.main`)."""
