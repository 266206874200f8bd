"""The parts of the DT Data Connector receiver that do not depend on Flask."""
