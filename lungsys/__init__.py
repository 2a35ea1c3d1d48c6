"""The ``lungsys`` command: one module per command group, each thin (it parses, calls the
packages of the design, prints). :mod:`lungsys.app` builds the command from the groups;
nothing below imports this package."""
