"""pacsnode: an AI node for hospital imaging networks.

Not a medical device: the bundled models are for demonstration and testing.
"""

__version__ = "0.1.0"
