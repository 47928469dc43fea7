"""qadapt's built-in backend plugins, one module each, found through the ``qadapt`` entry-point group like any other."""
