"""Where stream logs live: the interfaces, and the stores that implement them."""
