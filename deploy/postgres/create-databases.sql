-- One database per service: a service never reads another's tables.
CREATE DATABASE order_intake;
CREATE DATABASE inventory;
CREATE DATABASE shipping;
CREATE DATABASE notifications;
CREATE DATABASE kpi;
