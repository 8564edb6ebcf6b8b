"""uvmkit: build and boot-test the boot files of a Linux utility VM."""

__version__ = "0.1.0"
