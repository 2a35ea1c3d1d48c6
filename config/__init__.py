"""The documented default configuration of the node (TOML files shipped as
package data)."""
