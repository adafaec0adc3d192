//! Listening sockets: unix and TCP, bound once in the master.
