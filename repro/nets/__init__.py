"""Networks, our own implementations under upstream's names, their factory, checkpoint format and converter."""
