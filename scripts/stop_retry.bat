@echo off
rem Para o reprocessador de falhas.
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0bg.ps1" stop retry retry_failed.py %*
exit /b %ERRORLEVEL%
