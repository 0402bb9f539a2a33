"""The version of opdviz, in a leaf module so that the modules that record it import nothing above them."""

__version__ = "0.1.0"
