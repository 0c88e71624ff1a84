"""A plugin file that fails while being imported."""

raise ImportError("this plugin needs a package that is not installed")
