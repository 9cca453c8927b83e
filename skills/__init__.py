"""Skills turn a routed turn into a stream of text. One module per skill, registered in ``skills.registry``."""
