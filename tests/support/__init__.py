"""What the tests stand on: stand-ins for DT's services, PostgreSQL, the real server and signing."""
