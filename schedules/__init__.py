"""Scheduled jobs (APScheduler): the nightly generation rollover runs from here."""
